# Placeholder: the multi-stage, non-root runtime image is issue 5's work. Not built or tested.
FROM scratch
