"""The near-duplicate audit (``bonebreak audit``): find exact and near copies, join them into groups, draw
leak-free grouped splits, and write the split manifest and reports a person can check by eye."""
