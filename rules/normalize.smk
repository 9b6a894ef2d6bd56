# normalize reads each source's own manifest, not data/manifest.json: that one also names the
# model, and a new model must not rerun normalize (it never reads the model)
rule normalize:
    input:
        raw=raw_dirs(),
        manifests=[paths.source_manifest(s["name"]) for s in PARAMS["data"]["sources"]],
        code=code("normalize"),
        readers=user_readers(),
    output:
        splits=expand(f"{paths.NORMALIZE}/{{split}}.parquet", split=SPLITS),
        stats=f"{paths.NORMALIZE}/stats.json",
        config=f"{paths.NORMALIZE}/config.yaml",  # what made them (ftflow.freshness): DVC versions it with them
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
