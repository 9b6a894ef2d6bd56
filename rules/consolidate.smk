rule consolidate:
    input:
        trained=rules.train.output.model,
        tokenizer=rules.pack.output.tokenizer,
        base=base_model(),
        code=code("consolidate"),
    output:
        model=directory(f"{paths.CONSOLIDATE}/model"),
        summary=f"{paths.CONSOLIDATE}/summary.json",
    log:
        f"{paths.LOGS}/consolidate.log",
    params:
        cfg=params_of("consolidate"),
    conda:
        "../envs/ftflow.yaml"
    script:
        "../scripts/consolidate.py"
