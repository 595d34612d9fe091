rule plan:
    input:
        stamped_input("prompts.source"),
    output:
        result(layout.PROMPTS),
    params:
        config=CONFIG_FILE,
    log:
        log_file("plan"),
    benchmark:
        bench_file("plan")
    threads: resource("plan", "threads")
    resources:
        **job_resources("plan"),
    conda:
        conda_env("plan")
    shell:
        "iteralign plan --config {params.config} --output {output} > {log} 2>&1"
