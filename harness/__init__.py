"""The training harness: config, model, optimizers, schedules, run log, trainer."""
