rule evaluate:
    input:
        tuned=rules.consolidate.output.model,
        base=base_model(),
        tokenizer=rules.pack.output.tokenizer,
        test=f"{paths.NORMALIZE}/test.parquet" if "test" in SPLITS else [],
        tasks=expand("conf/eval/tasks/{task}.yaml", task=PARAMS["eval"]["tasks"]),
        code=code("evaluate"),
    output:
        metrics=f"{paths.EVALUATE}/metrics.json",
        base=f"{paths.EVALUATE}/base/results.json",
        tuned=f"{paths.EVALUATE}/tuned/results.json",
    log:
        f"{paths.LOGS}/evaluate.log",
    params:
        cfg=params_of("evaluate"),
    conda:
        "../envs/ftflow.yaml"
    script:
        "../scripts/evaluate.py"
