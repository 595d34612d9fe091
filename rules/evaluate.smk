# Same held-out prompts and decoding every round (round 0 = the SFT model).
# Win rates compare with round 0 (baseline) and round n-1 (previous) on those prompts.
rule evaluate:
    input:
        prompts=result(layout.PROMPTS),
        checkpoint=round_checkpoint,
        reference=checkpoint_dir(0),
        baseline=eval_baseline,
        previous=eval_previous,
        scorers=evaluation_scorer_files(),
    output:
        table=result(layout.eval_table("{n}")),
        summary=report(
            result(layout.eval_summary("{n}")),
            caption="../report/evaluation.rst",
            category="Evaluation",
            labels={"round": "{n}", "file": layout.eval_summary("{n}")},
        ),
    params:
        iteralign=iteralign_command("evaluate"),
        config=CONFIG_FILE,
        baseline=input_options("baseline"),
        previous=input_options("previous"),
    log:
        log_file("evaluate", "{n}"),
    benchmark:
        bench_file("evaluate", "{n}")
    threads: resource("evaluate", "threads")
    resources:
        **job_resources("evaluate"),
    conda:
        conda_env("evaluate")
    shell:
        "{params.iteralign} evaluate --config {params.config} --round {wildcards.n} --prompts {input.prompts} "
        "--checkpoint {input.checkpoint} --reference-checkpoint {input.reference} {params.baseline} "
        "{params.previous} --table {output.table} --summary {output.summary} --threads {threads} > {log} 2>&1"
