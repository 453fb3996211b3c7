"""One run: the run spec (:mod:`.spec`) and the one guided sampler (:mod:`.sampler`), above the methods they run."""
