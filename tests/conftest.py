import pytest
import torch
from helpers import DEVICES


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
