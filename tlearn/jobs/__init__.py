"""The jobs behind the commands, one module each: extract, fit (linear heads), predict,
evaluate, sweep, heatmap; the labelled-feature sources fit reads from; the torchrun and
--shard versions of extract and predict. The CLI calls exactly one of these per command
and renders what it returns; nothing here prints."""
