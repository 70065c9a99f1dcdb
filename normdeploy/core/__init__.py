"""What every stage shares: graph helpers, the canonical ops, the norm catalogue, the pass
framework, the pattern matcher, and the linear-algebra of folds (affine sources, linear
layers, layout mapping). Nothing here imports a pipeline stage."""
