# ckpt_r0/FINAL is the round-0 policy and, for every round, the frozen reference.
if config["policy"]["sft_checkpoint"]:

    rule link_sft:
        input:
            stamp=stamped_input("policy.sft_checkpoint"),
        output:
            directory(checkpoint_dir(0)),
        params:
            config=CONFIG_FILE,
        log:
            log_file("link_sft"),
        benchmark:
            bench_file("link_sft")
        localrule: True
        conda:
            conda_env("link_sft")
        shell:
            "iteralign link-sft --config {params.config} --stamp {input.stamp} --output {output} > {log} 2>&1"

else:

    rule sft:
        input:
            stamped_input("sft.data"),
        output:
            checkpoint=directory(checkpoint_dir(0)),
            metrics=result(layout.SFT_METRICS),
        params:
            config=CONFIG_FILE,
        log:
            log_file("sft"),
        benchmark:
            bench_file("sft")
        threads: resource("sft", "threads")
        resources:
            **job_resources("sft"),
        conda:
            conda_env("sft")
        shell:
            "iteralign sft --config {params.config} --output {output.checkpoint} "
            "--metrics {output.metrics} --threads {threads} > {log} 2>&1"
