"""Model merging (the ``merge`` verb): soups (``uniform``, ``greedy-soup``), ``slerp`` and
task-vector merges (``task-arithmetic``, ``ties``, ``dare``) of models of one architecture."""
