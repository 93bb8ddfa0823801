"""The SRD agent: the reference reward table, the red-mask environment and the DQN learner.

``reward`` is pure NumPy; ``env`` adds gymnasium and the stable-baselines3 ``VecEnv`` API;
``agent`` builds, trains, saves and loads the DQN and applies it to images (stage D3).
"""
