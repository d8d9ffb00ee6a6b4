"""Per-iteration schedules (MAE style): pure functions of the fractional epoch, so a resumed run is on the same curve."""
import math


def lr_at(epoch_f, lr, min_lr, warmup_epochs, epochs):
    """Linear warmup for `warmup_epochs`, then half-cycle cosine from `lr` down to `min_lr` at `epochs`."""
    if epoch_f < warmup_epochs:
        return lr * epoch_f / warmup_epochs
    progress = (epoch_f - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def adjust_learning_rate(optimizer, epoch_f, args):
    lr = lr_at(epoch_f, args.lr, args.min_lr, args.warmup_epochs, args.epochs)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def nested_dropout_rate_at(epoch_f, rate, ramp_epochs):
    """Linear ramp of the nested dropout rate from 0 to `rate` over `ramp_epochs`, then constant."""
    if ramp_epochs <= 0:
        return rate
    return rate * min(epoch_f / ramp_epochs, 1.0)
