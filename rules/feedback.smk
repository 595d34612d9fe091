rule feedback:
    input:
        samples=result("samples_r{n}.parquet"),
        rewards=result("rewards_r{n}.parquet"),
    output:
        result("feedback_r{n}.json"),
    params:
        config=CONFIG_FILE,
    log:
        log_file("feedback_r{n}.log"),
    benchmark:
        bench_file("feedback_r{n}.tsv")
    wildcard_constraints:
        n=r"[1-9]\d*",
    threads: resource("feedback", "threads")
    resources:
        **job_resources("feedback"),
    conda:
        conda_env("feedback")
    shell:
        "iteralign feedback --config {params.config} --round {wildcards.n} --samples {input.samples} "
        "--rewards {input.rewards} --output {output} > {log} 2>&1"
