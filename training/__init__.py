"""Training, evaluation and the checkpoint registry shared by service and worker."""
