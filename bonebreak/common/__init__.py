"""What every layer shares: the argument parser, file helpers, the notices every page and card shows,
and the names of a checkpoint folder's files and config keys. Imports nothing else of BoneBreak."""
