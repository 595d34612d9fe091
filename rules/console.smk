# The console: Snakemake shows its own progress; these add the numbers. A local rule
# runs in the Snakemake process (also under SLURM), so its stdout reaches the terminal:
# one line per round as soon as its evaluation exists. At the end of a successful run,
# the audit table (as `iteralign audit results/<exp>` prints it).
rule round_summary:
    input:
        evaluation=result("eval_r{n}.json"),
        feedback=round_feedback,
    output:
        log_file("round_r{n}.txt"),
    params:
        feedback=input_option("feedback"),
    log:
        log_file("round_summary_r{n}.log"),
    localrule: True
    conda:
        conda_env("round_summary")
    shell:
        "iteralign round-summary --evaluation {input.evaluation} {params.feedback} --output {output} 2> {log}"


onsuccess:
    print_audit_table()
