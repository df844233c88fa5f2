"""The lab: how we decide what ships. The experiment runner, the paired repeated-CV selection protocol, its results
table and plot, CV ensembles and label-issue ranking. The product never imports it (an import-linter contract)."""
