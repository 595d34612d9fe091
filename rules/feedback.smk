rule feedback:
    input:
        samples=result(layout.samples("{n}")),
        rewards=result(layout.rewards("{n}")),
    output:
        result(layout.feedback("{n}")),
    params:
        config=CONFIG_FILE,
    log:
        log_file("feedback", "{n}"),
    benchmark:
        bench_file("feedback", "{n}")
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
