"""The data stages: download (data/raw/, data/models/, the manifest) and normalize (every
source's records -> one schema of chat messages, results/normalize/<split>.parquet).

    download.py   fetch sources and the base model where Snakemake runs (login nodes)
    normalize.py  the normalize stage: read, convert, filter, mix, split, write
    formats.py    file formats: JSON lines, Parquet, CSV, text, saved datasets, hub layouts
    readers.py    record shapes -> messages (alpaca, sharegpt, openai, ...), and user readers
    messages.py   the messages schema: validation, canonical form, Arrow table
"""
