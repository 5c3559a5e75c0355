"""
The FID Inception: the network of TensorFlow's inception-2015-12-05 graph on which FID,
sFID, the Inception Score and precision/recall are defined, written here in PyTorch and
loaded from pytorch-fid's weight file (pt_inception-2015-12-05-6726825d.pth).

    model = load_inception("pt_inception-2015-12-05-6726825d.pth", preprocess="adm")
    model.features(images)      # images in [0, 1], any size -> pool, logits, sFID features

Two ways into the network (PREPROCESS): "adm" is what ADM's evaluator feeds the TF graph
(TF1's legacy bilinear resize of 0..255 pixels, then (x - 128) / 128), the protocol behind
ADM's reference statistics; "pytorch-fid" is pytorch-fid's (half-pixel bilinear resize of
[0, 1] pixels, then 2x - 1).
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from weights import load_state_dict_strict, read_weights

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{INCEPTION_FILE}"
PREPROCESS = ("adm", "pytorch-fid")
INCEPTION_HELP = (f"pass --inception-weights PATH to pytorch-fid's {INCEPTION_FILE} (get it from "
                  f"{INCEPTION_URL}, or add --download to fetch it once into the torch hub cache)")


#################################################################################
#                     TF1's bilinear resize (ADM's preprocessing)               #
#################################################################################

def tf1_bilinear_weights(size_in, size_out):
    """(size_out, size_in) weights of TensorFlow 1's legacy ResizeBilinear along one axis
    (align_corners=False, half_pixel_centers=False), which the 2015 Inception graph applies
    to its input: output pixel i samples the input at i * size_in / size_out (computed in
    float32 as TF does), between floor of that and the next pixel, the last one repeated."""
    source = torch.arange(size_out, dtype=torch.float32) * torch.tensor(size_in / size_out, dtype=torch.float32)
    low = source.floor().long()
    frac = (source - low).double()
    weights = torch.zeros(size_out, size_in, dtype=torch.float64)
    rows = torch.arange(size_out)
    weights[rows, low] += 1 - frac
    weights[rows, (low + 1).clamp_max(size_in - 1)] += frac
    return weights


def resize_tf1_bilinear(x, size):
    """(N, C, H, W) -> (N, C, *size) with TF1's legacy bilinear resize: one weight matrix
    per axis, rows then columns."""
    rows = tf1_bilinear_weights(x.shape[-2], size[0]).to(x.device, x.dtype)
    columns = tf1_bilinear_weights(x.shape[-1], size[1]).to(x.device, x.dtype)
    return rows @ x @ columns.t()


#################################################################################
#                   The FID Inception (TensorFlow's 2015 graph)                 #
#################################################################################
# The network of TF's inception-2015-12-05 graph that FID, sFID and IS are defined on.
# It is torchvision's InceptionV3 layout with the differences pytorch-fid found: the
# average pools inside the A, C and first E blocks exclude the zero padding from the
# mean (count_include_pad=False), the last E block max-pools, and the classifier has
# 1008 outputs. Parameter names follow torchvision, so pytorch-fid's weights load as is.

class BasicConv2d(nn.Module):
    def __init__(self, in_channels, out_channels, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


def avg_pool_3x3(x):
    # TF's SAME average pool divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pool branches."""

    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(avg_pool_3x3(x))
        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        branch3x3 = self.branch3x3(x)
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch3x3dbl, branch_pool], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions. Its output starts with the 192
    channels of branch1x1."""

    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = conv(branch7x7dbl)
        branch_pool = self.branch_pool(avg_pool_3x3(x))
        return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], 1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = conv(branch7x7x3)
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], 1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs. pool: "avg" in Mixed_7b, "max" in Mixed_7c
    (a quirk of the TF graph that every FID number carries)."""

    def __init__(self, in_channels, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        if self.pool == "max":
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = avg_pool_3x3(x)
        branch_pool = self.branch_pool(pooled)
        return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], 1)


class FIDInceptionV3(nn.Module):
    """forward(x): RGB in [0, 1] (N, 3, H, W), any size -> pool3 features (N, 2048).
    features(x): pool3, logits and the sFID spatial features from one pass."""

    def __init__(self, preprocess="pytorch-fid"):
        super().__init__()
        if preprocess not in PREPROCESS:
            raise ValueError(f"preprocess must be one of {PREPROCESS}, got {preprocess!r}")
        self.preprocess_mode = preprocess
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)
        self.initialize_weights()

    def initialize_weights(self):
        # Only for runs without the real weights (tests, benchmarks): He init keeps the
        # activation scale roughly constant through the ReLU stack.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def preprocess(self, x):
        """[0, 1] at any size -> 299x299 network input, as self.preprocess_mode says:
        "pytorch-fid": bilinear resize with half-pixel centres (F.interpolate,
        align_corners=False), then 2x - 1;
        "adm": ADM's evaluator feeds 0..255 pixels to the TF graph, which resizes with TF1's
        legacy bilinear kernel (no half-pixel centres) and maps (x - 128) / 128.
        The two differ by a fraction of a grey level per pixel, enough to move FID."""
        if self.preprocess_mode == "adm":
            x = 255 * x
            if x.shape[-2:] != (299, 299):
                x = resize_tf1_bilinear(x, (299, 299))
            x = (x - 128) / 128
        else:
            if x.shape[-2:] != (299, 299):  # a same-size bilinear resize is the identity
                x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            x = 2 * x - 1
        if x.device.type == "cpu":
            # oneDNN runs these convolutions about 1.4x faster on channels-last input
            # (bench.py); GPUs keep the default layout, where it was not measured.
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def features(self, x):
        """Returns a dict:
        pool            (N, 2048)  pool3, for FID and precision/recall
        logits          (N, 1008)  the classifier output, fc(pool)
        logits_unbiased (N, 1008)  pool @ fc.weight.T: what the Inception Score is defined
                                   on (OpenAI's improved-gan code and ADM's evaluator take
                                   the softmax/logits MatMul of the TF graph, not its bias)
        spatial         (N, 2023)  ADM's sFID features, see below
        """
        x = self.preprocess(x)                                            # (N, 3, 299, 299)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                     # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                    # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                     # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))               # (N, 288, 35, 35)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))               # (N, 768, 17, 17)
        x = self.Mixed_6d(x)                                             # (N, 768, 17, 17)
        # sFID: ADM's evaluator reads the TF tensor "mixed_6/conv:0" and keeps channels
        # [..., :7]. The TF graph names its mixed blocks mixed, mixed_1, mixed_2 (torch
        # Mixed_5b/c/d), mixed_3 (Mixed_6a), mixed_4..mixed_7 (Mixed_6b..6e), mixed_8..10
        # (Mixed_7a/b/c); so mixed_6 is Mixed_6d. Inside a block, "conv" (no tower
        # prefix) is the 1x1 branch (the weight ports map mixed_6/conv/conv2d_params and
        # mixed_6/conv/batchnorm to Mixed_6d.branch1x1.conv/.bn), and the op named after
        # the scope itself is its output after batch norm and ReLU. That is
        # Mixed_6d.branch1x1(x), which the block's concat puts first: channels 0..191 of
        # Mixed_6d's output. ADM flattens NHWC, (N, 17, 17, 7) -> 2023, so go to
        # channels-last before flattening.
        spatial = x[:, :7].permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # (N, 17*17*7)
        x = self.Mixed_6e(x)                                             # (N, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))               # (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))                                        # (N, 2048)
        logits_unbiased = pool @ self.fc.weight.t()                      # (N, 1008)
        return {"pool": pool, "logits": logits_unbiased + self.fc.bias,
                "logits_unbiased": logits_unbiased, "spatial": spatial}

    def forward(self, x):
        return self.features(x)["pool"]


def download_inception():
    """Fetches pytorch-fid's weights into the torch hub cache (only behind --download)."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.hub.download_url_to_file(INCEPTION_URL, path)
    return path


def load_inception(weights=None, preprocess="pytorch-fid"):
    """The FID Inception in eval mode: random weights when `weights` is None, else
    pytorch-fid's pt_inception-2015-12-05-6726825d.pth (torchvision key layout),
    loaded strictly; preprocess: "adm" or "pytorch-fid" (see FIDInceptionV3.preprocess)."""
    model = FIDInceptionV3(preprocess)
    if weights is not None:
        state = read_weights(weights, "Inception weight file", INCEPTION_HELP)
        # Files saved before torch 0.4.1 lack the batch-norm step counters, which eval
        # never reads (torch's own loader fills them in the same way); all else is strict.
        for key, value in model.state_dict().items():
            if key.endswith("num_batches_tracked") and key not in state:
                state[key] = torch.zeros_like(value)
        load_state_dict_strict(model, state, weights)
    return model.eval().requires_grad_(False)
