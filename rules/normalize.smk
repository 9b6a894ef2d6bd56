rule normalize:
    input:
        raw=raw_dirs(),
        manifest=paths.MANIFEST,
        code=code("normalize", "formats", "readers", "messages", "parallel"),
        readers=user_readers(),
    output:
        splits=expand(f"{paths.NORMALIZE}/{{split}}.parquet", split=SPLITS),
        stats=f"{paths.NORMALIZE}/stats.json",
    threads: ALL_CORES
    log:
        f"{paths.LOGS}/normalize.log",
    params:
        cfg=params_of("normalize"),
    resources:
        **slurm_resources("normalize"),
    conda:
        "../envs/data.yaml"
    script:
        "../scripts/normalize.py"
