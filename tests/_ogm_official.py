"""GeWu-Lab/OGM-GE_CVPR2022's training loop (main.py @ 0f64793, train_epoch lines 70-153)
transcribed once, with the official AVClassifier layouts it scores (concat and sum fusion),
for the tests that run it against ModulatedOptimizer (tests/methods/test_authors_loops.py,
tests/fusion/test_fusion_sum_split.py). docs/semantics.md section 1 names the lines."""
import torch
import torch.nn as nn


def conv_encoder(channels: int, width: int) -> nn.Module:
    """The small conv encoder of the test nets (two 3x3 convolutions, pooled)."""
    return nn.Sequential(nn.Conv2d(channels, width, 3), nn.ReLU(), nn.Conv2d(width, width, 3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


class AVNet(nn.Module):
    """The official AVClassifier, fusion_method "concat": audio_net, visual_net (conv encoders,
    pooled), and fusion_module.fc_out over the concatenated features."""
    fusion_method = "concat"

    def __init__(self, classes=4, width=3):
        super().__init__()
        self.audio_net, self.visual_net = conv_encoder(1, width), conv_encoder(2, width)
        self.fusion_module = nn.Module()
        self.fusion_module.fc_out = nn.Linear(2 * width, classes)

    def forward(self, spec, image):
        a, v = self.audio_net(spec), self.visual_net(image)
        return a, v, self.fusion_module.fc_out(torch.cat((a, v), 1))


class SumAVNet(nn.Module):
    """The official AVClassifier, fusion_method "sum": fusion_module = SumFusion (fc_x on
    audio, fc_y on visual, both with a bias; models/fusion_modules.py lines 5-13)."""
    fusion_method = "sum"

    def __init__(self, classes=4, width=3):
        super().__init__()
        self.audio_net, self.visual_net = conv_encoder(1, width), conv_encoder(2, width)
        self.fusion_module = nn.Module()
        self.fusion_module.fc_x = nn.Linear(width, classes)
        self.fusion_module.fc_y = nn.Linear(width, classes)
        with torch.no_grad():  # biases far from 0, so the split matters
            self.fusion_module.fc_x.bias.copy_(torch.linspace(-2.0, 2.0, classes))
            self.fusion_module.fc_y.bias.copy_(torch.linspace(1.5, -1.5, classes))

    def forward(self, spec, image):
        a, v = self.audio_net(spec), self.visual_net(image)
        return a, v, self.fusion_module.fc_x(a) + self.fusion_module.fc_y(v)


def official_ogm_epoch(args, epoch, model, batches, optimizer):
    """train_epoch (the model is not wrapped in DataParallel here, so a parameter's top-level
    name is split('.')[0], not [1]); ``args``: alpha, modulation ("OGM" or "OGM_GE"),
    modulation_starts, modulation_ends; the fusion is the model's ``fusion_method``. Returns
    each step's (coeff_a, coeff_v)."""
    criterion = nn.CrossEntropyLoss()
    softmax = nn.Softmax(dim=1)
    relu = nn.ReLU(inplace=True)
    tanh = nn.Tanh()
    coeffs = []
    for spec, image, label in batches:
        optimizer.zero_grad()
        a, v, out = model(spec, image)
        if model.fusion_method == "sum":  # lines 82-86
            out_v = (torch.mm(v, torch.transpose(model.fusion_module.fc_y.weight, 0, 1)) +
                     model.fusion_module.fc_y.bias / 2)
            out_a = (torch.mm(a, torch.transpose(model.fusion_module.fc_x.weight, 0, 1)) +
                     model.fusion_module.fc_x.bias / 2)
        else:  # concat (the rest of lines 82-93)
            weight_size = model.fusion_module.fc_out.weight.size(1)
            out_v = (torch.mm(v, torch.transpose(model.fusion_module.fc_out.weight[:, weight_size // 2:], 0, 1))
                     + model.fusion_module.fc_out.bias / 2)
            out_a = (torch.mm(a, torch.transpose(model.fusion_module.fc_out.weight[:, :weight_size // 2], 0, 1))
                     + model.fusion_module.fc_out.bias / 2)
        loss = criterion(out, label)
        loss.backward()
        score_v = sum([softmax(out_v)[i][label[i]] for i in range(out_v.size(0))])
        score_a = sum([softmax(out_a)[i][label[i]] for i in range(out_a.size(0))])
        ratio_v = score_v / score_a
        ratio_a = 1 / ratio_v
        if ratio_v > 1:
            coeff_v = 1 - tanh(args["alpha"] * relu(ratio_v))
            coeff_a = 1
        else:
            coeff_a = 1 - tanh(args["alpha"] * relu(ratio_a))
            coeff_v = 1
        coeffs.append(tuple(float(torch.as_tensor(c).detach()) for c in (coeff_a, coeff_v)))
        if args["modulation_starts"] <= epoch <= args["modulation_ends"]:
            for name, parms in model.named_parameters():
                layer = str(name).split('.')[0]
                if 'audio' in layer and len(parms.grad.size()) == 4:
                    if args["modulation"] == 'OGM_GE':
                        parms.grad = parms.grad * coeff_a + \
                            torch.zeros_like(parms.grad).normal_(0, parms.grad.std().item() + 1e-8)
                    elif args["modulation"] == 'OGM':
                        parms.grad *= coeff_a
                if 'visual' in layer and len(parms.grad.size()) == 4:
                    if args["modulation"] == 'OGM_GE':
                        parms.grad = parms.grad * coeff_v + \
                            torch.zeros_like(parms.grad).normal_(0, parms.grad.std().item() + 1e-8)
                    elif args["modulation"] == 'OGM':
                        parms.grad *= coeff_v
        optimizer.step()
    return coeffs


def batches(seed, n=4, b=6, classes=4):
    """``n`` random batches (spectrogram, image, label) of the nets' input shapes."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 1, 8, 8, generator=g) * (1 + i % 2), torch.randn(b, 2, 8, 8, generator=g),
             torch.randint(0, classes, (b,), generator=g)) for i in range(n)]
