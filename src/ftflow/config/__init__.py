"""The configuration: conf/ (Hydra) composed into params.yaml, checked against the schema.

params.py  params.yaml: composed from conf/, checked (once per change), projected per stage
schema.py  a pydantic model per section, and each stage's typed config (StageConfig)
"""
