"""The benchmark task's shape, importable without Keras (the PyTorch + PEFT
worker of `bench_vs_peft.py` runs where Keras is not installed)."""

BATCH = 16
SEQ = 128
NUM_CLASSES = 5
# all-MiniLM-L6-v2's shape, with random weights (no download).
BERT = dict(
    vocabulary_size=30522,
    num_layers=6,
    num_heads=12,
    hidden_dim=384,
    intermediate_dim=1536,
    max_sequence_length=512,
)
