# The SFT model scores this round's feedback once, in its own job, so that the
# train job never holds a reference model in memory.
rule reference:
    input:
        feedback=result(layout.feedback("{n}")),
        checkpoint=checkpoint_dir(0),
    output:
        result(layout.reference_logps("{n}")),
    params:
        config=CONFIG_FILE,
        launch=launcher("reference"),
    log:
        log_file("reference", "{n}"),
    benchmark:
        bench_file("reference", "{n}")
    wildcard_constraints:
        n=r"[1-9]\d*",
    threads: resource("reference", "threads")
    resources:
        **job_resources("reference"),
    conda:
        conda_env("reference")
    shell:
        "{params.launch} reference --config {params.config} --round {wildcards.n} --feedback {input.feedback} "
        "--checkpoint {input.checkpoint} --output {output} --threads {threads} > {log} 2>&1"
