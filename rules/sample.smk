# Round n samples from ckpt_r{n-1}, or with sampling.lag L from ckpt_r{n-1-L} (at least
# ckpt_r0): then it does not wait for round n-1's training.
rule sample:
    input:
        prompts=result(layout.PROMPTS),
        checkpoint=sampling_checkpoint,
    output:
        result(layout.samples("{n}")),
    params:
        iteralign=iteralign_command("sample"),
        config=CONFIG_FILE,
    log:
        log_file("sample", "{n}"),
    benchmark:
        bench_file("sample", "{n}")
    wildcard_constraints:
        n=r"[1-9]\d*",
    threads: resource("sample", "threads")
    resources:
        **job_resources("sample"),
    conda:
        conda_env("sample")
    shell:
        "{params.iteralign} sample --config {params.config} --round {wildcards.n} --prompts {input.prompts} "
        "--checkpoint {input.checkpoint} --output {output} --threads {threads} > {log} 2>&1"
