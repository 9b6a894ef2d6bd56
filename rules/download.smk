# Login nodes have internet, compute nodes often do not: downloads run where Snakemake runs.
localrules:
    download,
    download_source,
    download_model,
    download_eval,


wildcard_constraints:
    source=r"[^/]+",
    model=r"[^/]+",
    dataset=r"[^/]+",


# One job per source and per model, so a new or changed source downloads alone and the others
# stay in place (Snakemake deletes a job's outputs before it runs).
rule download_source:
    input:
        local=local_source,
        code=code("download"),
    output:
        raw=directory(f"{paths.RAW}/{{source}}"),
        manifest=paths.source_manifest("{source}"),
    log:
        f"{paths.LOGS}/download/{{source}}.log",
    conda:
        "../envs/data.yaml"
    params:
        cfg=lambda wildcards: source_params(wildcards.source),
    script:
        "../scripts/download.py"


rule download_model:
    input:
        local=local_model(),
        code=code("download"),
    output:
        model=directory(f"{paths.MODELS}/{{model}}"),
        manifest=paths.model_manifest("{model}"),
    log:
        f"{paths.LOGS}/download/model-{{model}}.log",
    conda:
        "../envs/data.yaml"
    params:
        cfg=params_of("download")["model"],
    script:
        "../scripts/download.py"


# The hub data of an lm-eval built-in task (eval.datasets): compute nodes evaluate offline.
# evaluate takes its manifest as input; data/manifest.json does not gather it, so a change of
# eval tasks reruns evaluate alone, not normalize and all that follows.
rule download_eval:
    input:
        code=code("download"),
    output:
        manifest=paths.eval_manifest("{dataset}"),
    log:
        f"{paths.LOGS}/download/eval-{{dataset}}.log",
    conda:
        "../envs/data.yaml"
    params:
        cfg=lambda wildcards: eval_dataset_params(wildcards.dataset),
    script:
        "../scripts/download.py"


rule download:
    input:
        sources=[paths.source_manifest(s["name"]) for s in PARAMS["data"]["sources"]],
        models=[] if SCRATCH else [paths.model_manifest(MODEL["name"])],
        code=code("download"),
    output:
        manifest=paths.MANIFEST,
    log:
        f"{paths.LOGS}/download/manifest.log",
    conda:
        "../envs/data.yaml"
    params:
        cfg=sources_and_model(),
    script:
        "../scripts/download.py"
