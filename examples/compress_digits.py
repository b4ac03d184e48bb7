"""slimfx.compress on a CNN trained on real data: accuracy and size before and after."""
import slimfx
from slimfx.models import evaluate, pretrained

model, data = pretrained("digits-cnn")
small = slimfx.compress(model, (data.test_x[:32],), pipeline="dead-code,fold-bn")
print(small.report.summary())
print("original   accuracy %.2f%%" % (100 * evaluate(model, data.test_x, data.test_y)[0]))
print("compressed accuracy %.2f%%" % (100 * evaluate(small, data.test_x, data.test_y)[0]))
print(small.print_ir())
