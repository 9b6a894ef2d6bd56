# Login nodes have internet, compute nodes often do not: download runs where Snakemake runs.
localrules:
    download,


rule download:
    input:
        local=local_sources(),
        code=code("download"),
    output:
        manifest=paths.MANIFEST,
        raw=raw_dirs(),
        models=[] if SCRATCH else [directory(base_model())],
    log:
        f"{paths.LOGS}/download.log",
    params:
        cfg=params_of("download"),
    conda:
        "../envs/ftflow.yaml"
    script:
        "../scripts/download.py"
