# The SFT model scores this round's feedback once, in its own job, so that the
# train job never holds a reference model in memory.
rule reference:
    input:
        feedback=result(layout.feedback("{n}")),
        checkpoint=checkpoint_dir(0),
    output:
        result(layout.reference_logps("{n}")),
    params:
        config=CONFIG_FILE,
        launch=launcher("reference"),
    log:
        log_file("reference", "{n}"),
    benchmark:
        bench_file("reference", "{n}")
    wildcard_constraints:
        n=r"[1-9]\d*",
    threads: resource("reference", "threads")
    resources:
        **job_resources("reference"),
    conda:
        conda_env("reference")
    shell:
        "{params.launch} reference --config {params.config} --round {wildcards.n} --feedback {input.feedback} "
        "--checkpoint {input.checkpoint} --output {output} --threads {threads} > {log} 2>&1"


# GRPO's importance ratio under sampling.lag: the checkpoint that sampled round n scores
# its feedback, as the reference job does with the SFT model (none on policy: the train
# job scores the policy it starts from).
rule old_policy:
    input:
        feedback=result(layout.feedback("{n}")),
        checkpoint=sampling_checkpoint,
    output:
        result(layout.old_policy_logps("{n}")),
    params:
        config=CONFIG_FILE,
        launch=launcher("old_policy"),
    log:
        log_file("old_policy", "{n}"),
    benchmark:
        bench_file("old_policy", "{n}")
    wildcard_constraints:
        n=r"[1-9]\d*",
    threads: resource("old_policy", "threads")
    resources:
        **job_resources("old_policy"),
    conda:
        conda_env("old_policy")
    shell:
        "{params.launch} old-policy --config {params.config} --round {wildcards.n} --feedback {input.feedback} "
        "--checkpoint {input.checkpoint} --output {output} --threads {threads} > {log} 2>&1"
