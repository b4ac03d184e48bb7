"""torch.compile(backend="slimfx"): passes run on each Dynamo graph, then Inductor compiles the result."""
import torch

import slimfx
from slimfx.models import evaluate, pretrained

model, data = pretrained("digits-transformer")
report = slimfx.Report("")
compiled = torch.compile(model, backend="slimfx", options={"pipeline": "dead-code,fold-bn", "report": report})
with torch.no_grad():
    for batch in (16, 32, 449):  # other batch sizes reuse one dynamic graph
        compiled(data.test_x[:batch])
print(report.summary())
print("compiled accuracy %.2f%%" % (100 * evaluate(compiled, data.test_x, data.test_y)[0]))
