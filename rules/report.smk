# One self-contained HTML page over every round: plots, the audit table, provenance, config.
rule report:
    input:
        evaluations=expand(result("eval_r{n}.{ext}"), n=range(ROUNDS + 1), ext=["json", "parquet"]),
        training=expand(result("train_r{n}.jsonl"), n=TRAIN_ROUNDS),
        feedback=expand(result("feedback_r{n}.json"), n=TRAIN_ROUNDS),
        rewards=expand(result("rewards_r{n}.parquet"), n=TRAIN_ROUNDS),
        audit=result("audit.tsv"),
    output:
        report(result("report.html"), caption="../report/report.rst", category="Report"),
    params:
        config=CONFIG_FILE,
        results=output_folder,
        benchmarks=str(BENCH),
    log:
        log_file("report.log"),
    benchmark:
        bench_file("report.tsv")
    localrule: True
    threads: 1
    resources:
        mem_mb=resource("report", "mem_mb"),
        runtime=resource("report", "runtime"),
    conda:
        conda_env("report")
    shell:
        "iteralign report {params.results} --config {params.config} --benchmarks {params.benchmarks} "
        "--output {output} > {log} 2>&1"
