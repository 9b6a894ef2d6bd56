rule pack:
    input:
        train=f"{paths.NORMALIZE}/train.parquet",
        validation=f"{paths.NORMALIZE}/validation.parquet",
        base=[] if SCRATCH else [base_model()],
        code=code("pack", "spans", "templates", "parallel") + templates(),
    output:
        packed=packed_dirs(),
        tokenizer=directory(f"{paths.PACK}/tokenizer"),
        stats=f"{paths.PACK}/stats.json",
    threads: ALL_CORES
    log:
        f"{paths.LOGS}/pack.log",
    params:
        cfg=params_of("pack"),
    resources:
        **slurm_resources("pack"),
    conda:
        "../envs/data.yaml"
    script:
        "../scripts/pack.py"
