rule audit:
    input:
        evaluations=expand(result("eval_r{n}.json"), n=range(ROUNDS + 1)),
        training=expand(result("train_r{n}.jsonl"), n=TRAIN_ROUNDS),
    output:
        report(result("audit.tsv"), caption="../report/audit.rst", category="Audit"),
    params:
        results=output_folder,
        benchmarks=str(BENCH),
    log:
        log_file("audit.log"),
    benchmark:
        bench_file("audit.tsv")
    localrule: True
    conda:
        conda_env("audit")
    shell:
        "iteralign audit {params.results} --benchmarks {params.benchmarks} --output {output} > {log} 2>&1"
