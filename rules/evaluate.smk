rule evaluate:
    input:
        tuned=f"{paths.CONSOLIDATE}/model",
        base=base_model(),
        tokenizer=f"{paths.PACK}/tokenizer",
        data=inputs.task_data_files(PARAMS["eval"]["tasks"]),  # the tasks' local data files
        tasks=inputs.task_files(PARAMS["eval"]["tasks"]),  # their YAMLs (not lm-eval's built-ins)
        hub_data=eval_manifests(),  # the built-in tasks' data, downloaded on the login node
        train=f"{paths.NORMALIZE}/train.parquet",  # what the examples are checked against (contamination)
        code=code("evaluate"),
    output:
        metrics=f"{paths.EVALUATE}/metrics.json",
        comparison=f"{paths.EVALUATE}/comparison.json",
        table=f"{paths.EVALUATE}/comparison.md",  # base | tuned | delta per task and metric
        card=f"{paths.EVALUATE}/model_card.md",  # the consolidated model's card + these results
        contamination=f"{paths.EVALUATE}/contamination.json",  # per task: examples also in the training data
        overlaps=f"{paths.EVALUATE}/contamination.jsonl",  # each such example and the records it is in
        base=directory(f"{paths.EVALUATE}/base"),  # lm-eval results.json + per-sample outputs
        tuned=directory(f"{paths.EVALUATE}/tuned"),
        config=f"{paths.EVALUATE}/config.yaml",  # what made them (ftflow.freshness): DVC versions it with them
    log:
        f"{paths.LOGS}/evaluate.log",
    conda:
        "../envs/eval.yaml"
    threads: ALL_CORES
    resources:
        **slurm_resources("evaluate"),
    params:
        cfg=params_of("evaluate"),
    script:
        "../scripts/evaluate.py"
