# Checkpoints (results/train/checkpoints/<config fingerprint>/) are deliberately not outputs:
# Snakemake deletes the outputs of a failed job, and a rerun must resume from them.
rule train:
    input:
        packed=[f"{paths.PACK}/{s}" for s in PACKED_SPLITS],
        tokenizer=f"{paths.PACK}/tokenizer",
        base=[] if SCRATCH else [base_model()],
        manifest=paths.MANIFEST,  # what was downloaded, recorded in the model's provenance
        code=code("train"),
        rewards=reward_files(PARAMS["train"]),
    output:
        model=directory(f"{paths.TRAIN}/model"),
        init=directory(paths.TRAIN_INIT),  # always: dvc.yaml's outputs do not depend on the model
        curve=f"{paths.TRAIN}/loss.csv",
        summary=f"{paths.TRAIN}/summary.json",
        config=f"{paths.TRAIN}/config.yaml",  # what made them (ftflow.freshness): DVC versions it with them
        probe=f"{paths.TRAIN}/probe.safetensors",  # the trained model's logits, for consolidate's check
    log:
        f"{paths.LOGS}/train.log",
    conda:
        "../envs/train.yaml"
    threads: ALL_CORES
    resources:
        **slurm_resources("train"),  # GPUs per node and nodes from launcher (see ftflow.workflow.slurm)
    params:
        cfg=params_of("train"),
    script:
        "../scripts/train.py"
