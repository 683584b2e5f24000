"""Plain stand-ins for generated protobuf messages, for tests of pure logic."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FakePredict:
    Prompt: str = ""
    Tokens: int = 0
    Temperature: float = 0.0
    TopP: float = 0.0
    TopK: int = 0
    MinP: float = 0.0
    Penalty: float = 0.0
    FrequencyPenalty: float = 0.0
    PresencePenalty: float = 0.0
    Seed: int = 0
    StopPrompts: list[str] = field(default_factory=list)
    IgnoreEOS: bool = False
    LogitBias: str = ""
    Logprobs: int = 0
    TopLogprobs: int = 0
    Grammar: str = ""
    TypicalP: float = 0.0


@dataclass
class FakeModelOptions:
    Model: str = "some/model"
    ModelFile: str = ""
    ModelPath: str = ""
    ContextSize: int = 0
    MaxModelLen: int = 0
    Seed: int = 0
    DType: str = ""
    Quantization: str = ""
    LoadFormat: str = ""
    GPUMemoryUtilization: float = 0.0
    TrustRemoteCode: bool = False
    EnforceEager: bool = False
    SwapSpace: int = 0
    TensorParallelSize: int = 0
    Tokenizer: str = ""
    DisableLogStatus: bool = False
    Embeddings: bool = False
    Reranking: bool = False
    LimitImagePerPrompt: int = 0
    LimitVideoPerPrompt: int = 0
    LimitAudioPerPrompt: int = 0
    Options: list[str] = field(default_factory=list)
    EngineArgs: str = ""
    Overrides: list[str] = field(default_factory=list)
    DraftModel: str = ""
    LoraAdapter: str = ""
    LoraAdapters: list[str] = field(default_factory=list)
    LoraScale: float = 0.0
    LoraScales: list[float] = field(default_factory=list)
    # llama.cpp-family settings (backend/gateway_settings.py)
    CacheTypeKey: str = ""
    CacheTypeValue: str = ""
    RopeScaling: str = ""
    RopeFreqScale: float = 0.0
    RopeFreqBase: float = 0.0
    YarnExtFactor: float = 0.0
    YarnAttnFactor: float = 0.0
    YarnBetaFast: float = 0.0
    YarnBetaSlow: float = 0.0
    Threads: int = 0
    MainGPU: str = ""
    TensorSplit: str = ""
    NGPULayers: int = 0
    LowVRAM: bool = False
    MMap: bool = False
    MLock: bool = False
    NUMA: bool = False
    FlashAttention: str = ""
    NoKVOffload: bool = False
