"""SRD (Semantic Reward Defense) at a glance: stages D1 -> D4 as the functions each one calls.

The defender holds the backdoored captioner and its training data (some captions poisoned, their
images triggered) but not the trigger. SRD learns where to paint a red square so that the
captioner's output goes back to a clean captioner's, paints one square per training image and
refine-tunes on the painted images. Each stage is one entry point; ``run/run_SRD.sh`` chains
them, and every stage reads the files of the one before.

D1 pool (``train/srd_pool.py``): the RL pool, training images with a stand-in trigger::

    ids = pool.choose_pool_ids(train_ids, pool_size, seed)           # seeded draw of images
    rows = pool.build_pool_rows(ids, load_fn, caption_fn, reference_fn, score_fn, seed)
        # each image with a surrogate trigger (pool.surrogate_image; --pool_source data:
        # pool_source.data_pool_rows, the defender's own images as they are), the backdoored
        # model's caption, the clean reference caption and their baseline S_sem / S_flu
    pool.write_pool_shard(folder, rank, ranks, rows, ...); pool.finish_pool(folder, ...)

D2 agent (``train/srd_train.py``): a DQN whose action is one square (10x10 centres x 5 sizes)::

    vec_env = vecenv.BatchedRedMaskVecEnv(pool_source.stream_pool(folder, mb), caption_fn, score_fn)
        # step: env paints the square (geometry.apply_action), captions the image, scores it
        # against the reference (evaluation.sfs) and pays reward.reward_table's piecewise reward
        # (ours, off by default: variants' area cost and occlusion-map channel, --area_cost,
        # --occlusion_grid)
    model, training = dqn.train_dqn(vec_env, dqn_config, reward_log)  # stable-baselines3
    dqn.run_random_policy(...); dqn.evaluate_greedy(model, envs)     # the controls, same pool
    dqn.agent_report(training, random, greedy, n); policy.save_policy(model, path, dqn_config)

D3 clean (``train/srd_clean_data.py``): one square per training image, sharded over processes::

    tries = clean.PolicyTries(policy.load_policy(path), n_tries=5, epsilon=0.05, seed)
        # (--policy random: squares.RandomTries, the agent-free ablation)
    clean.clean_shard(shards.ShardWriter(folder, ...), version_fn, tries, clean.RewardModels(...))
        # per image: up to 5 tries (policy.draw_try_actions), each scored like a D2 step; the
        # best positive reward is kept (policy.select_mask), written to this process's shard

D3b combine (``train/combine_data.py``)::

    merge.combine_clean_data(folder, train_ids)   # shards.merge_shards: nothing missing or twice
        # -> clean_data/merged.json, the cleaning manifest: one kept square per image id

D4 refine-tune (``train/defend.py --defense srd``; the registry entry is :mod:`.defense`)::

    manifest = merge.read_merged(folder); merge.check_cleaning_run(manifest, checkpoint, ...)
    squares = merge.masked_training_actions(records, manifest)        # {image id: action}
    images = versions.VersionImages(data, triggered, squares)         # the one mask painter
    engine.train(captioner, CaptionDataset(samples, images), budget)  # captions unchanged

Then stage B again (``eval/evaluate.py``), stage C, and the figures (:mod:`.figures`).
Diagnosis beside the chain: :mod:`srd.defenses.coverage` (do the kept squares cover the real
trigger?) and :mod:`.landscape` (how the reward depends on image and square). ``inputs`` holds
the flags and loaders the SRD entry points share.
"""
