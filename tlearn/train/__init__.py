"""Fine-tuning (`tlearn fit --head linear|mlp`): a new neural head on the cut network,
freezing, learning rates per layer group, augmentation, validation every epoch, early
stopping, checkpoints and resume.

How an epoch runs depends on what is frozen (the run's `mode`, chosen in train.build):
- features: the backbone never trains and augmentation is none/flip: pooled features are
  computed once (and once more for the mirrored images with flip) and the head trains on
  them; no backbone pass per epoch.
- prefix:   everything below a block boundary (--freeze-to) is frozen and augmentation is
  none/flip: the frozen prefix's output maps are computed once (fp16, in memory or on
  disk) and each epoch runs only the trainable suffix and the head. With flip the cached
  maps are mirrored, a cheap stand-in for mirroring the image (not exact).
- images:   every epoch decodes and augments the images and runs the network (the frozen
  prefix without autograd).
Validation images are never augmented, so their frozen prefix is computed once too.

Under torchrun (WORLD_SIZE > 1) the same run is data-parallel: every rank trains on its
slice of each global batch through DistributedDataParallel and only rank 0 writes; see
train.dist for how it stays equal to a single process.

Nothing here prints: progress and results go through the `events` callback as
(name, dict) pairs, and the CLI renders them.

Modules, bottom to top (each imports only those before it): options, datasets, plan,
schedule, dist, history; lr_groups, groups, optim; build (the Setup of a run);
checkpoint, frozen; batches, validate; steps, ddp; loop, finish; api (fit_nn, resume_nn).
"""
