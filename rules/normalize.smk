rule normalize:
    input:
        raw=raw_dirs(),
        manifest=paths.MANIFEST,
        code=code("normalize"),
        readers=user_readers(),
    output:
        splits=expand(f"{paths.NORMALIZE}/{{split}}.parquet", split=SPLITS),
        stats=f"{paths.NORMALIZE}/stats.json",
    log:
        f"{paths.LOGS}/normalize.log",
    conda:
        "../envs/data.yaml"
    threads: ALL_CORES
    resources:
        **slurm_resources("normalize"),
    params:
        cfg=params_of("normalize"),
    script:
        "../scripts/normalize.py"
