rule score:
    input:
        samples=result(layout.samples("{n}")),
        reward_model=scorer_files(),
    output:
        result(layout.rewards("{n}")),
    params:
        config=CONFIG_FILE,
        launch=launcher("score"),
    log:
        log_file("score", "{n}"),
    benchmark:
        bench_file("score", "{n}")
    wildcard_constraints:
        n=r"[1-9]\d*",
    threads: resource("score", "threads")
    resources:
        **job_resources("score"),
    conda:
        conda_env("score")
    shell:
        "{params.launch} score --config {params.config} --round {wildcards.n} --samples {input.samples} "
        "--output {output} --threads {threads} > {log} 2>&1"
