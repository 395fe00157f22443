"""Shape limits of the shared codebook storage format (:class:`lit_cb.layers.CodebookFormat`),
kept torch-free so the method configs can validate against them without importing torch."""

ALLOWED_GROUP_SIZES = (1, 2, 4, 8, 16)
MIN_NBITS, MAX_NBITS = 1, 16
LOW_RANK_BITS = (16, 8)  # how a low-rank slot's factors may be stored (lit_cb.layers.CodebookLinear.round_low_rank)
