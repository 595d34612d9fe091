# The console: Snakemake shows its own progress; these add the numbers. A local rule
# runs in the Snakemake process (also under SLURM), so its stdout reaches the terminal:
# one line per round as soon as its evaluation exists. At the end of a successful run,
# the audit table (as `iteralign audit results/<exp>` prints it).
rule round_summary:
    input:
        evaluation=result(layout.eval_summary("{n}")),
        feedback=round_feedback,
    output:
        str(LOGS / layout.round_summary("{n}")),
    params:
        feedback=input_options("feedback"),
    log:
        log_file("round_summary", "{n}"),
    localrule: True
    conda:
        conda_env("round_summary")
    shell:
        "iteralign round-summary --evaluation {input.evaluation} {params.feedback} --output {output} 2> {log}"


onsuccess:
    print_audit_table()
