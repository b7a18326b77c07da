"""Running a job on Ray: the unit tasks and their commit, model actors, progress, the output lease, --extend."""
