"""Data: shard writing (``shards``), the WebDataset DataModule (``datamodule``) and its training stream (``stream``:
seeded shard reading, mixing, bad-data handling, exact resume), ``dataset.json`` and the normalisation convention
(``info``), built-in datasets (``builtin``: toy 2-D mixtures, scikit-learn digits).

Import the submodules directly; this package imports nothing, so ``lit_gen.data.builtin`` stays cheap to import.
"""
