"""Stage ``canonicalize``: recognizers turn third-party spellings of a normalization into one
canonical node (DESIGN.md section 2); the stage changes no math."""
