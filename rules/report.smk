# One self-contained HTML page over every round: plots, the audit table, provenance, config.
rule report:
    input:
        evaluations=every_round(layout.eval_summary, range(ROUNDS + 1)),
        tables=every_round(layout.eval_table, range(ROUNDS + 1)),
        training=every_round(layout.training_metrics, TRAIN_ROUNDS),
        feedback=every_round(layout.feedback, TRAIN_ROUNDS),
        rewards=every_round(layout.rewards, TRAIN_ROUNDS),
        audit=result(layout.AUDIT),
    output:
        report(result(layout.REPORT), caption="../report/report.rst", category="Report"),
    params:
        config=CONFIG_FILE,
        results=output_folder,
        benchmarks=str(BENCH),
    log:
        log_file("report"),
    benchmark:
        bench_file("report")
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
