rule score:
    input:
        samples=result("samples_r{n}.parquet"),
        reward_model=scorer_files(),
    output:
        result("rewards_r{n}.parquet"),
    params:
        config=CONFIG_FILE,
        launch=launcher("score"),
    log:
        log_file("score_r{n}.log"),
    benchmark:
        bench_file("score_r{n}.tsv")
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
