# The report's files, from the stages' outputs; `ftflow report` (or `snakemake --report
# results/report.html`) embeds them in one HTML file.
localrules:
    report,


# the headline figures of the report's first page (workflow/report/workflow.rst)
config["report"] = inputs.report_headline()


rule report:
    input:
        normalize=f"{paths.NORMALIZE}/stats.json",
        pack=f"{paths.PACK}/stats.json",
        curve=f"{paths.TRAIN}/loss.csv",
        train=f"{paths.TRAIN}/summary.json",
        model=f"{paths.TRAIN}/model",  # its provenance.json
        consolidate=f"{paths.CONSOLIDATE}/summary.json",
        evaluate=f"{paths.EVALUATE}/comparison.json",
        contamination=f"{paths.EVALUATE}/contamination.json",
        manifest=paths.MANIFEST,
        configs=[f"{folder}/config.yaml" for folder in paths.RECORDING.values()],  # each stage's, checked and shown
        code=code("report"),
    output:
        normalize=report(
            report_file("normalize"),
            caption="../workflow/report/normalize.rst",
            category="1. Data",
            subcategory="normalize",
            labels={"stage": "normalize", "figure": "records per source"},
        ),
        pack=report(
            report_file("pack"),
            caption="../workflow/report/pack.rst",
            category="1. Data",
            subcategory="pack",
            labels={"stage": "pack", "figure": "tokens and packing"},
        ),
        loss=report(
            report_file("loss"),
            caption="../workflow/report/loss.rst",
            category="2. Training",
            labels={"stage": "train", "figure": "loss curve"},
        ),
        evaluate=report(
            report_file("evaluate"),
            caption="../workflow/report/eval.rst",
            category="3. Evaluation",
            labels={"stage": "evaluate", "figure": "base vs tuned"},
        ),
        provenance=report(
            report_file("provenance"),
            caption="../workflow/report/provenance.rst",
            category="4. Provenance",
            labels={"stage": "train", "figure": "what produced the model"},
        ),
        summary=report_file("summary"),
    log:
        f"{paths.LOGS}/report.log",
    conda:
        "../envs/data.yaml"
    params:
        cfg=params_of("report"),
    script:
        "../scripts/report.py"
