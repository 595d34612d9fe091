rule audit:
    input:
        evaluations=every_round(layout.eval_summary, range(ROUNDS + 1)),
        training=every_round(layout.training_metrics, TRAIN_ROUNDS),
    output:
        report(result(layout.AUDIT), caption="../report/audit.rst", category="Audit"),
    params:
        results=output_folder,
        benchmarks=str(BENCH),
    log:
        log_file("audit"),
    benchmark:
        bench_file("audit")
    localrule: True
    conda:
        conda_env("audit")
    shell:
        "iteralign audit {params.results} --benchmarks {params.benchmarks} --output {output} > {log} 2>&1"
